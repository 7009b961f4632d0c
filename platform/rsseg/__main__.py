from rsseg.cli import main

main()
