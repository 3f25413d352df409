"""The roles engine: Host, Step, run_roles, role settings, root files through sudo, the wheelhouse."""
