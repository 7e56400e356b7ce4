from lamra_pl.cli import main

main()
