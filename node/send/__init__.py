"""Send: the durable outbox (:mod:`.outbox`) drained by C-STORE to the destinations (:mod:`.sender`)."""
