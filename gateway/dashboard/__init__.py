"""The ward dashboard: a static page (built from web/dashboard/) and the server that serves it."""
