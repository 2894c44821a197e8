"""Served teachers: the HTTP server (`gopd serve`), its client, and a helper that starts one."""
