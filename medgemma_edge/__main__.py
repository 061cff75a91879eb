from medgemma_edge.cli import main

raise SystemExit(main())
