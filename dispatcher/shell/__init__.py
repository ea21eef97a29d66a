"""The dispatcher's NATS shell: everything that talks to NATS around the pure core.

    service.py   the process: topology, rpc intake, leader election, status
    lease.py     the KV lease (one leader)
    leader.py    the leader's session: pull, decide (core), hand out, take outcomes back
    puller.py    per-tier pull requests into a bounded window
    intake.py    a JOBS message -> a schedulable job or its refusal
    refusals.py  results and dead letters for refused jobs
    rpc.py       request/reply on <prefix>.rpc.<tier>
"""
