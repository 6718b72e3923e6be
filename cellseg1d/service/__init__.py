"""Running as a long-lived service: systemd notification, metrics and health, logging."""
