"""`medplib serve`: a web page and a JSON API on one loaded model (server.py)."""
