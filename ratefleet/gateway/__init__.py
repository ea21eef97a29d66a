"""The OpenAI-compatible gateway (`ratefleet gateway`): HTTP requests in, jobs on each
caller's tier through the fleet, the upstream's answers out. See app.py for one request's path."""
