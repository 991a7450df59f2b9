from specontext_compiler.cli import main

main()
