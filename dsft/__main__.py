from dsft.cli.app import main

main()
