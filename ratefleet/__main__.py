from ratefleet.cli import app

app()
