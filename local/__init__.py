"""Developer-machine tools (the local bus, fake FCM, console, the stack). Never deployed; never imported by
shared/, and by functions/main.py only behind DELIVER_URL (refused in the cloud)."""
