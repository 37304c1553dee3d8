"""The upload worker: claims requests with a lease, runs the transfer engine, records outcomes and delivers callbacks."""
