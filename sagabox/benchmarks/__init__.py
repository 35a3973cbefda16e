"""``sagabox bench saga``: end-to-end sagas/s against DBOS and Temporal, and the machine's limits.

- workload: the orders (10% declined), the seed, the business steps every system runs;
- drive: closed-loop (C in flight) and open-loop (fixed arrival rate) drivers;
- cpu, store: CPU time from /proc, commit counts and saga statuses from PostgreSQL;
- saga: sagabox's processes on the example services, measured;
- limits: pgbench (a saga transition) and raw pika (pipelined confirms);
- peers/: the same saga on DBOS Transact and on Temporal, each in its own process;
- run: one run of all of them side by side; report and plot format the figures.
"""
