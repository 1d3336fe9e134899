"""Receive: C-STORE in (:mod:`.scp`), a first look at each image (:mod:`.triage`), the durable file in the
spool (:mod:`.spool`) and its rows, instance and job, in the database (:mod:`.store`)."""
