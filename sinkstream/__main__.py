from sinkstream.cli import main

main()
