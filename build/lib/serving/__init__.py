"""The BentoML service for models exported by `harden export` (see serving/service.py)."""
