"""The dispatcher's NATS shell: everything that talks to NATS around the pure core.

    service.py   the process: topology, rpc intake, leader election, status
    lease.py     the KV lease (one leader)
    leader.py    the leader's session: NATS -> events (one memory stream) -> core/leader.py -> commands -> NATS
    bus.py       LeaderBus, the leader's seam to NATS, and its nats-py implementation
    memory_bus.py  an in-memory LeaderBus for fast tests
    puller.py    per-tier pull inboxes: pull requests out, deliveries (read by intake) in
    keycontrol.py  the keys bucket (disabled keys kept across leaders)
    intake.py    a JOBS message -> a schedulable job or its refusal
    refusals.py  results and dead letters for refused jobs
    rpc.py       request/reply on <prefix>.rpc.<tier>
"""
