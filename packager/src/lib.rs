//! Environments: analyze, create, run and cache (filled in by the packager issue).
