"""Scans as jobs the command line runs: a journal written as tiles or scenes finish, so that a stopped scan
resumes; merge and write (`job`); the scenes of an archive and many scenes on Ray workers."""
