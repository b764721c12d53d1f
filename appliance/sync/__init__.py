"""Results leaving the box: what a finished job puts in the outbox, and the transports that deliver it."""
