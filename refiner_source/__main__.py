from refiner_source.cli import main

main()
