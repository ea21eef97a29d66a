from ratefleet.cli import main

main()
