"""The test suite (a package, so that tests import their fixtures as ``tests.fixtures``)."""
