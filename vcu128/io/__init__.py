"""Files and processes: one-line errors, strict JSON, unbuffered I/O, staging folders and ownership, progress."""
