from ratefleet.cli import app

app(prog_name="ratefleet")  # messages name the command users type, not `python -m ratefleet`
