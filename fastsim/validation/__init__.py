"""fastsim against published measurements of real serving systems (bench/validate.py prints it)."""
