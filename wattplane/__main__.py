from wattplane.cli import main

raise SystemExit(main())
