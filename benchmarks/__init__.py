"""aiograceful's benchmarks: ``python -m benchmarks`` (see benchmarks/README.md).

They measure; they do not test. Nothing here is collected by pytest.
"""
