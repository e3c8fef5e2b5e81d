"""The triage step: analysing a complete study (scan, select, volumes, engine, SR/SEG), the
priority decision and the waiting-list clock that re-decides as days pass and orders change."""
