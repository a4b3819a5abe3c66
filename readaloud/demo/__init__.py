"""The synthetic demo data set (generator.py), beside the package's steps, not among them."""
