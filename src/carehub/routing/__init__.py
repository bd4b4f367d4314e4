"""Routing: which routes a message matches, and running each route's steps."""
