from m3dm.cli import main

main()
