"""Send: the durable outbox (:mod:`.outbox`) drained by the sending threads (:mod:`.sender`), each over a
:class:`~.link.Link` to a destination (:mod:`.association`: opening it, TLS, what a failure means);
``gradcam-node echo`` (:mod:`.echo`)."""
