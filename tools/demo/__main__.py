from tools.demo.pipeline import main

main()
