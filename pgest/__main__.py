from pgest.cli import main

main()
