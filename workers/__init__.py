"""Workers: a bounded pool of upstream calls per process, results published, jobs acked."""
