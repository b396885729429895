from refiner_source.run.cli import main

if __name__ == "__main__":  # a spawned backfill worker imports this module too
    main()
