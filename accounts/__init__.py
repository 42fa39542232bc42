"""Users and authentication: custom User, registration, JWT login/refresh/logout, login throttling."""
