from clipdex.cli.main import main

main()
