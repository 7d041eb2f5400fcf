"""Drafting and verification: draft trees, drafters, verifiers, sampling."""
