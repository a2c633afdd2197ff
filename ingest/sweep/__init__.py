"""Archive sweeps: query a PACS, DICOMweb server or folder for past studies, retrieve them, draft them.

``sources`` (configured sources), ``window`` (off-peak window and cron schedule),
``query`` (find studies and count instances), ``retrieve`` (bring them here),
``store`` (Part 10 bytes into the listener's storage and index), ``ledger``
(sweep state in the database), ``runner`` (the coordinator's part).
"""
