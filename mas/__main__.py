from mas.cli import main

main()
