from cputwin.cli import main

main()
