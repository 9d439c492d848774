"""What the control socket answers: request handlers and status views."""
