from functionalnetworkssft.cli import main

raise SystemExit(main())
