from mas.entry import main

main()
