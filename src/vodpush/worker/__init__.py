"""The upload worker: claims requests with a lease, runs the transfer engine, records the
outcomes and delivers callbacks."""
