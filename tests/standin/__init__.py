"""A stand-in third destination, for the test that registers it: one package (delivery, people)
and one line of the registry are all a destination needs."""
