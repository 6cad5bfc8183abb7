"""The studies behind bench/RESULTS.md, one per module, each run as
``python -m bench.studies.<name>`` (``make bench*``). A study imports bench's product and
bench.harness, never another study."""
