"""The same ``place_order`` saga on other systems, each run in its own process.

Every peer does the same business work (participants/examples' handlers, on the same
tables, all in one application database as those systems expect), with the same
orders, failure mix, concurrency and consistency check (harness.py).
"""
