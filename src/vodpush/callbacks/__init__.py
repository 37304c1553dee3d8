"""Callbacks: where one may go (``policy``), what is sent (``payload``), sending it once
(``delivery``), and when to try again (``schedule``)."""
