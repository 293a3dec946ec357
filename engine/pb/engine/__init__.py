"""Modules generated from proto/ at build time by scripts/gen_proto.py (setup.py runs it)."""
